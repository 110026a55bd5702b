"""The supervisor behind `nexrl-launch`: placement parsing, spawning, supervision."""

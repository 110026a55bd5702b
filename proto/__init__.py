"""Data package holding the language-neutral wire contract (schema.json); see README.md here."""

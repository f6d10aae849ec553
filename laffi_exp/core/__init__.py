"""Core: records, prompts, hashing, files, config checks and errors: what every part uses."""

"""Knowledge bases of the user's own documents: parse, chunk, embed, index (SQLite), retrieve."""

"""Search over an indexed gallery: the index folder, queries by text or image, explanations of a
match, and the web service with its page (`itmatch index`, `itmatch search`, `itmatch serve`)."""

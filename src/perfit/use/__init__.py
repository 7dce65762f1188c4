"""What an owner does with a finished run: export a client's adapter (`export`), chat with it
(`chat`), or join a finished federation with data of their own (`join`)."""

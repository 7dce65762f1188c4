"""What an owner does with a finished run: export a client's adapter (`export`) or join a finished
federation with data of their own (`join`); `perfit chat` answers with `client.generation`."""

"""`selftune serve`: an OpenAI-compatible API and a web chat page over one decode engine.

protocol.py checks request bodies, engine.py batches decoding in a worker thread, app.py holds
the routes; the command that loads the model lives in selftune/commands/serve.py.
"""

"""`malmm serve`: an OpenAI-compatible HTTP front end on the engine (FastAPI + uvicorn, the
extra `malmm[serve]`). It parses requests, keeps videos read once, queues the work for the
one model and presents records; it owns no model code.

    settings.py   what the server is made of, with every default once (torch- and fastapi-free)
    access.py     who may ask and which files: API key, loopback hosts, --allow-dir folders
    protocol.py   request bodies -> work, records -> OpenAI's response shapes, errors
    worker.py     the model's one thread: a bounded queue, videos kept under an LRU budget
    app.py        the FastAPI routes and the guard in front of them
    server.py     uvicorn on a socket bound first, SIGTERM and Ctrl-C ending it gracefully
"""

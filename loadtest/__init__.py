"""Load tests of the running stack: k6 (qaio.js) and locust (locustfile.py); `make loadtest` runs run.py."""

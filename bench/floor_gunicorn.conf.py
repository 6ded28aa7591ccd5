"""gunicorn settings for bench/floor_apps.py: the worker's own (worker/gunicorn.conf.py, read from the
tree it is in), without the engine process, which those apps never call."""
import os

_worker_conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "worker", "gunicorn.conf.py")
exec(compile(open(_worker_conf).read(), _worker_conf, "exec"))
engine_process = False  # read by on_starting, after this file

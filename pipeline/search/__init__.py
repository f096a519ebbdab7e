"""The built-in asynchronous search (search=optuna): its space (space.py), its launch (launch.py), the loop each
worker runs (worker.py), the study the workers share (study.py) and what `status` says of it (summary.py)."""

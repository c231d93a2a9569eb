"""Deployments: a YAML file that describes a whole cluster on one host (schema.py) and the supervisor that
brings it up, watches it and takes it down (supervisor.py); `slipstream up CONFIG` runs them."""

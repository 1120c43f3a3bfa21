"""What the gateway and the worker must agree on: settings, key names, schemas, errors."""

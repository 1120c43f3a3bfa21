"""What operators use: health, metrics, events, the admin routes, live workers, the `mlxq` command and the dashboard."""

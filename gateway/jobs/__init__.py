"""mlxq's own job API: jobs as RQ holds them, batches (fan-outs), and their routes."""

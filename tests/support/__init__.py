"""What tests run against: real redis-servers (`redis_servers`) and mlxq's own processes (`processes`)."""

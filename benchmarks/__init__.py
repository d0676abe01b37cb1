"""Benchmarks and studies, on a floor of their own: they may import every package (launcher,
router, shards, layers, clients) and nothing imports them; `shardserve bench-*` runs them by
module name (launcher/cli.py), so serving never loads one."""

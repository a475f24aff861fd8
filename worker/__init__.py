"""tpns-batcher: turn a stream of TPNS account bind/unbind intents into the fewest correct calls."""

"""``endofuse worker``: runs inference for API replicas through the Redis request streams."""

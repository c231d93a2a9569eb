"""How an engine core drives its N model workers: uni (one process), mp (one process per GPU on one node),
ray (Ray actors placed by a placement group). Rank 0 always runs in the engine-core process."""

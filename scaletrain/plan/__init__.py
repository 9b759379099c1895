"""`scaletrain plan`: what a layout costs per rank before anything is launched.

shards.py builds the recipe's model on the meta device and applies its real parallelize under a fake process
group (any world size, in one process, no memory), so the per-rank parameter shards come from the same code
that trains; memory.py turns them into bytes by precision, optimizer and data-parallel flavour.
"""

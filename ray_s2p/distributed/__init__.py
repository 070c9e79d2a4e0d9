"""The distributed trainer: driver and replicas, writing the ledger of seeds and scalars (zo/ledger.py).

Follow one step: driver.py (the phases of a step) -> replica.py (Ray actors, or
in-process) -> engine.py (a replica's probes and updates) -> messages.py (what
travels) -> zo/ledger.py (what is kept). Around it: healing.py (a replica that fails
in any phase is replaced and caught up), layout.py (who serves which seeds and
shards), pool.py (the pool protocol), replica_files.py (a replica's checkpoint tensors and export), console.py, run_state.py, checkpoint.py, run_dir.py, replay.py, digest.py.

Only driver.py and replica.py import Ray, and only when a run uses it; this
package face imports nothing, so ``ray_s2p.distributed.replay`` stays light.
"""

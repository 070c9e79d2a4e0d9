"""Benchmarks of ``ray-s2p bench``: what a zeroth-order step costs and how the trainer scales.

- common.py: the base config, the shared context, machine info, JSON lines and timing;
- step.py: one in-process step per (mechanism, distribution) against two bare forwards;
- cluster.py: Driver runs on Ray (scaling, traffic, recovery, replay);
- memory.py: peak memory of inference, zeroth-order and AdamW steps, each in a fresh process;
- driver.py: the driver's peak memory and traffic for the smoke model and a random 1 B Llama
  (random_llama.py, the task it trains), each run in a fresh process;
- runner.py: runs the named benchmarks and appends their JSON lines (the CLI's entry).

Nothing outside bench/ and cli/ imports these modules (the replicas of the driver benchmark
load random_llama.py by its name in ``task.name``, as they load any user task).
"""

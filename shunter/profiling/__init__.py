"""Measuring the real engine for the simulator's `profiled` latency model (`shunter profile`).

The simulator only reads profiles (`shunter.sim.profiled`, torch-free); building
the real model and timing its steps happens here, where torch is allowed.

    machine.py   what the machine is and how busy other processes keep it (torch-free)
    profiler.py  the grid of steps and the driver that times them on any engine (torch-free)
    real.py      the built-in model behind that engine; a whole profiling run (torch)
    report.py    the fit's table and summary
    cli.py       `shunter profile`
"""

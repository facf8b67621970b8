"""Imported only by multiprocessing's fork server, which has it in its preload list
(``lifeline.fork_server_context``): the fork server ignores the stop signals.

A stop signal sent to the whole process group or job (SLURM's time limit, ``timeout``,
``kill -- -PGID``) reaches the fork server too. Were it to die, every pool whose workers it forked
would read its workers as dead (their exit is reported through the fork server) and break, where
the stage should commit what is finished and stop. Processes it forks inherit the ignoring: a
decoding worker keeps it (``lifeline.leave_stops_to_the_parent``), a shard process takes the
default back at once and its own handler soon after.
"""

import signal

from soundstage.pipeline.lifeline import STOP_SIGNALS

for _number in STOP_SIGNALS:
    signal.signal(_number, signal.SIG_IGN)

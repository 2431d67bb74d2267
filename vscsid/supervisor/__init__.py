"""The supervisor process (the control plane): the vhost-user socket and one
session per front end (session), the LUN table (luns), the worker processes
(workerpool) and their life (lifecycle, a pure state machine), and every OS effect
behind one layer (osops) that tests replace. It spawns the data plane by module
name and never imports it."""
from .daemon import Supervisor
from .luns import LunTable, disk_info

__all__ = ["Supervisor", "LunTable", "disk_info"]

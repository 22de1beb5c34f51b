"""``fxtrain demo``: the main job (see ``job``), its tasks, data and figures."""

from .job import DemoConfig as DemoConfig
from .job import DemoError as DemoError
from .job import run_demo as run_demo
from .tasks import MODELS as MODELS

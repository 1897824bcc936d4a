"""Every kind of long work, imported so that each registers its function (a worker imports this module)."""

from cifarviz.services import retrain  # noqa: F401 - "retrain-without": the Influence page's proof
from cifarviz.services.work import replicas, study, train  # noqa: F401 - "replica", "tune", "train"

import pytest

from nemo_quant.runtime.spawn import ChildProcessError, run_distributed
from tests import workers

pytestmark = pytest.mark.distributed


def test_all_ranks_return_values():
    assert run_distributed(workers.world_info, 2) == [(0, 2), (1, 2)]


def test_child_failure_surfaces_traceback_not_hang():
    with pytest.raises(ChildProcessError, match="deliberate failure on rank 1"):
        run_distributed(workers.raise_on_rank, 2, 1, timeout_s=60)


def test_hung_child_times_out():
    with pytest.raises(ChildProcessError, match="timed out"):
        run_distributed(workers.hang_forever, 1, timeout_s=5)

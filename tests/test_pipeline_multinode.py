"""A two-node Ray cluster on loopback, one stage per node: the same tokens as one process."""

import pytest
import ray
from ray.cluster_utils import Cluster

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def two_nodes():
    ray.shutdown()  # the other pipeline tests' local instance
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_one_stage_per_node_gives_the_same_tokens(two_nodes, tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", "v3", seed=5)
    prompts = [[5, 6, 7, 8], list(range(20, 45))]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with Engine(path, block_size=16) as local:
        expected = [r.token_ids for r in local.generate(prompts, params)]
    with Engine(
        path, pipeline=2, address=two_nodes.address, placement="STRICT_SPREAD", block_size=16
    ) as engine:
        nodes = {d["node_id"] for d in engine.executor.devices}
        assert len(nodes) == 2
        assert [r.token_ids for r in engine.generate(prompts, params)] == expected

"""Expert parallelism, one layer (scale_out.md section 4): two gloo processes, each holding half of every MoE
layer's routed experts and its own micro-batch, exchange tokens by all-to-all and give what one process gives when it
runs that micro-batch through the whole layer (outputs, input and router gradients <= 1e-6 in float32); each expert's
gradient, reduced over the expert-data-parallel group, is the mean over ranks of the one-process gradients. Softmax
top-k with capacity (tokens dropped), sigmoid+bias (DeepSeek-V3; biases stay equal on every rank), top-p, null and
shared experts, and CuMo's MoE connector (input width != output width)."""

from __future__ import annotations

import pytest
import torch
from distributed_worker import EP_CASES

from zoo.config import ConfigError
from zoo.moe import MoEConfig, MoELayer
from zoo.moe.parallel import check_expert_parallel

CASES = [*EP_CASES, "moe_mlp_connector"]


@pytest.fixture(scope="module")
def ep_layer(distributed):
    return distributed["ep_layer"]


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_layer_equals_one_process_per_micro_batch(ep_layer, case):
    for rank, results in enumerate(ep_layer):
        got = results[case]
        assert got["output"] <= 1e-6 and got["input_grad"] <= 1e-6 and got["router_grad"] <= 1e-6, (rank, got)
        assert got["expert_grad"] <= 1e-6, (rank, got)  # relative to the largest entry
        # each rank holds E/2 of the experts: half the parameters of the whole bank
        assert got["experts_held"] == 2 and 2 * got["expert_parameters"] == got["expert_parameters_whole"]
    if case == "softmax_topk_capacity":  # per-rank capacity groups really dropped slots (DeepSpeed-MoE's choice)
        assert all(r[case]["dropped"] > 0 for r in ep_layer)
    if case == "null_experts":
        assert all(r[case]["null_slots"] > 0 for r in ep_layer)
    if case == "sigmoid_bias":
        assert all(r[case]["bias_equal_across_ranks"] and r[case]["bias_equals_one_process"] for r in ep_layer)


def test_expert_parallel_refuses_what_it_cannot_split_naming_the_layer_and_field():
    layer = torch.nn.ModuleDict({"moe": MoELayer(MoEConfig(hidden_size=8, expert_size=8, num_experts=4))})
    with pytest.raises(ConfigError, match=r"train\.expert_parallel: 3 does not divide the world size 4"):
        check_expert_parallel(layer, 3, 4)
    with pytest.raises(ConfigError, match=r"train\.expert_parallel: 8 does not divide the 4 experts of moe "
                                          r"\(num_experts\)"):
        check_expert_parallel(layer, 8, 8)
    choice = torch.nn.ModuleDict({"moe": MoELayer(MoEConfig(hidden_size=8, expert_size=8, router="expert_choice"))})
    with pytest.raises(ConfigError, match=r"train\.expert_parallel: moe routes by expert choice"):
        check_expert_parallel(choice, 2, 2)
    assert list(check_expert_parallel(choice, 1, 2)) == ["moe.experts"]  # EP 1: nothing to refuse

"""Which path a model piece takes in a test: the Triton kernels (in the interpreter without a GPU), with or
without the split linears' partials handed on, or the torch references."""

from mlapipe.workers import ops


def take_path(monkeypatch, kernels: str) -> list[int]:
    """kernels: 'partials' (as the model runs: a split linear asked for its partials returns them),
    'summed' (every split linear sums its own) or 'torch' (the references). Returns the list that records
    the rank of each linear's result (3: partials) as the piece runs."""
    monkeypatch.setattr(ops, "uses_reference", lambda device: kernels == "torch")
    linear, ranks = ops.linear, []

    def recording_linear(x, w, unsummed=False):
        out = linear(x, w, unsummed and kernels == "partials")
        ranks.append(out.dim())
        return out

    monkeypatch.setattr(ops, "linear", recording_linear)
    return ranks

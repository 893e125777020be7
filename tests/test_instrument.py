"""DispatchCounter counts ops (forward and backward) and flags host syncs and host data."""
import torch

from ipmt_fast.instrument import DispatchCounter


def test_counts_forward_and_backward_ops_by_name():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    with DispatchCounter() as counter:
        torch.nn.functional.linear(x, w).relu().sum().backward()
    assert counter.ops["aten::mm"] >= 3  # forward, grad of x, grad of w
    assert counter.ops["aten::threshold_backward"] == 1
    assert counter.total == sum(counter.ops.values())
    assert counter.host_syncs == []


def test_flags_item_nonzero_and_tensors_from_python_data():
    x = torch.tensor([0.0, 1.0, 2.0])
    with DispatchCounter() as counter:
        float(x.sum())
        x.nonzero()
        torch.tensor([[3, 4]])
        x.tolist()  # dispatches nothing on the CPU: recorded by the wrapped method
    assert counter.host_syncs == ["aten::_local_scalar_dense", "aten::nonzero", "aten::lift_fresh", "Tensor.tolist"]
    assert torch.Tensor.tolist(x) == [0.0, 1.0, 2.0] and "recorded" not in torch.Tensor.tolist.__name__


def test_counts_inside_custom_ops_on_request():
    from ipmt_fast.ops import feed_forward

    x, w1, w2 = (torch.randn(*shape, requires_grad=True) for shape in ((1, 5, 4), (12, 4), (4, 12)))
    feed_forward(x, w1, w2, backend="compiled")  # builds the extension

    def step():
        for t in (x, w1, w2):
            t.grad = None
        feed_forward(x, w1, w2, backend="compiled").sum().backward()

    with DispatchCounter() as outside:
        step()
    with DispatchCounter(inside_custom_ops=True) as inside:
        step()
    assert outside.ops == inside.ops and outside.inner_total == 0
    assert outside.ops["ipmt_fast::feed_forward"] == outside.ops["ipmt_fast::feed_forward_backward"] == 1
    assert inside.inner_ops["aten::mm"] >= 4  # the backward's matmuls, issued from C++
    # The custom ops do their work through the calls inside them, so they are not device work.
    assert {"ipmt_fast::feed_forward", "ipmt_fast::feed_forward_backward"} <= inside.without_device_work
    assert inside.device_total < inside.total
    assert inside.inner_ops["aten::mm"] <= inside.inner_device_total < inside.inner_total  # views inside too


def test_device_work_leaves_out_views_and_allocations():
    a, w = torch.randn(4, 3), torch.randn(5, 4)
    with DispatchCounter() as counter:
        y = a.t()  # a view
        torch.empty(2)  # an allocation
        out = torch.mm(y, w.t())  # a view, then a product
        out.relu_()
    assert counter.total == 5
    assert counter.without_device_work == {"aten::t", "aten::empty"}
    assert counter.device_total == 2  # the product and the ReLU: what a GPU would launch

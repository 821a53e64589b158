"""Gradients of the differentiable ops (box coding), so models that backpropagate through decoded boxes (GIoU
losses) or targets keep working. The backward recomputes torchvision's operation sequence (reference.py)
with autograd: exactly torchvision's gradient, at a cost paid only when a gradient is needed."""
import torch

from . import reference


def _setup_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.arguments = inputs[2:]


def _gradients_through(function, tensors, arguments, grad_output):
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        output = function(*leaves, *arguments)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad_output.to(output.dtype), allow_unused=True))
    return tuple(next(grads) if leaf.requires_grad else None for leaf in leaves)


def _decode_backward(ctx, grad_output):
    weights, bbox_xform_clip, _float32_exp = ctx.arguments
    grads = _gradients_through(reference.decode_boxes, ctx.saved_tensors, (weights, bbox_xform_clip), grad_output)
    return (*grads, None, None, None)


def _encode_backward(ctx, grad_output):
    weights, _float32_log = ctx.arguments
    grads = _gradients_through(reference.encode_boxes, ctx.saved_tensors, (weights,), grad_output)
    return (*grads, None, None)


torch.library.register_autograd("rpn_ops::decode_boxes", _decode_backward, setup_context=_setup_inputs)
torch.library.register_autograd("rpn_ops::encode_boxes", _encode_backward, setup_context=_setup_inputs)

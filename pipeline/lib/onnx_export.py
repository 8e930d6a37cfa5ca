"""A torch model as one self-contained ONNX file that outputs p(parasitized) (the export stage's, and the GPU
check's)."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.lib.common import written_whole

PARITY_TOLERANCE = 1e-4  # max |prob difference| between ONNX fp32 and torch fp32; more means a broken export


class _Probability(torch.nn.Module):
    """The network plus its softmax: the exported graph outputs p(parasitized) per image."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), 1)[:, 1]


def to_onnx(model: torch.nn.Module, size: int, path: Path) -> None:
    """One self-contained ONNX file (weights inside) with a dynamic batch, checked by onnx.checker."""
    import onnx

    example = torch.zeros(2, 3, size, size)  # a dynamic batch needs an example of at least 2
    with written_whole(path) as tmp:  # a killed export never leaves a half-written model beside an old manifest
        torch.onnx.export(_Probability(model).eval(), (example,), str(tmp), dynamo=True, external_data=False,
                          input_names=["image"], output_names=["prob"], verbose=False,
                          dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
        proto = onnx.load(str(tmp))
        _drop_source_records(proto.graph)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))


def _drop_source_records(graph) -> None:
    """Clear what the exporter records of the Python source per node (stack traces, module paths, file names): the
    same model exported from two checkouts then gives the same bytes."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs]:
                _drop_source_records(sub)

"""Memory and checkpoint sizing of ResNet-50 at 300 px for docs/operations.md ("Sizing").

Measures, with torch on the CPU (the numbers are device-independent tensor sizes):
- parameters, buffers, and the bytes of a checkpoint with AdamW state (parameters +
  buffers + two moments per parameter, fp32);
- the bytes autograd saves for backward during one forward pass (the activations a
  training step keeps alive until backward), counted exactly with
  torch.autograd.graph.saved_tensors_hooks, at two batch sizes (2 and 4) to get the per-image
  slope (it is linear in the batch);
- the peak resident memory of a fresh process for one forward+backward at 8 and 16
  images
  (allocator and workspace overheads included), as a cross-check.

Run: /root/.cache/hsat/venv-torch-2.13.0/bin/python scripts/k8s/resnet50_sizing.py
(about two minutes on 2 cores). Prints one JSON object.
"""

import json
import resource
import sys

import torch
import torchvision

SIZE = 300
EMBEDDING = 128  # model.num_embedding_out: 2048 features -> Linear -> 128
RSS_BATCHES = (8, 16)


def model():
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Linear(2048, EMBEDDING)
    return net


def saved_bytes(net, batch):
    """Bytes autograd saves for backward in one forward pass (unique storages)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, SIZE, SIZE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    out.sum().backward()
    return sum(seen.values())


def peak_rss_step(batch):
    """Peak RSS (bytes) of a fresh process running one forward+backward."""
    import subprocess

    code = (
        "import resource, torch, torchvision, sys; sys.path.insert(0, %r);"
        "import resnet50_sizing as s; net = s.model(); net.train();"
        "x = torch.randn(%d, 3, %d, %d); net(x).sum().backward();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    ) % (sys.path[0], batch, SIZE, SIZE)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = model()
    net.train()
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers())
    small, large = 2, 4
    act_small = saved_bytes(net, small)
    act_large = saved_bytes(net, large)
    per_image = (act_large - act_small) / (large - small)
    # Larger batches for the RSS cross-check: at 2 and 4 images the peak is the
    # libraries' start-up, not the step.
    rss_small = peak_rss_step(RSS_BATCHES[0])
    rss_large = peak_rss_step(RSS_BATCHES[1])
    print(
        json.dumps(
            {
                "image_size": SIZE,
                "parameters": params,
                "buffers": buffers,
                "checkpoint_bytes_fp32_with_adamw": 4 * (3 * params + buffers),
                "saved_for_backward_bytes": {str(small): act_small, str(large): act_large},
                "saved_for_backward_bytes_per_image": per_image,
                "peak_rss_bytes": {str(RSS_BATCHES[0]): rss_small, str(RSS_BATCHES[1]): rss_large},
                "peak_rss_bytes_per_image": (rss_large - rss_small) / (RSS_BATCHES[1] - RSS_BATCHES[0]),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

"""Evaluation modes. Each scores every validation target exactly once and returns
sums (NLL in nats, bytes, targets) for the caller to reduce across processes."""

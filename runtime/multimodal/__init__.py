"""Images in requests: reading them (data URLs, base64, http(s) with limits and SSRF refusal, allowed local paths),
decoding and preprocessing them with the checkpoint's own HF processor in the ingress, and putting the tensors in the
shared-memory arena the workers read (docs/multimodal.md)."""

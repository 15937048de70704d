"""Vision language serving on one GPU with dummy weights: image prefill throughput through the ModelRunner, then a
server answering requests with one image each. Prints two tables (markdown) and writes them to --out.

The checkpoint folder is built here: config.json of the shape, its image processor, and the tokenizer of --tokenizer
with the <image> token added (the vocabulary is sized to it; the shapes' own tokenizers are not on the machine):
- llava-onevision-7b (default): llava-hf/llava-onevision-qwen2-7b-ov-hf's shape, SigLIP so400m/14 at 384 px (729
  tokens a tile), anyres up to 6x6 tiles capped at anyres_max_9, Qwen2-7B; the benchmark's 384x384 images take
  1 + 1 tiles: 729 + 729 + 27 newlines = 1485 image tokens;
- qwen2-vl-7b: Qwen/Qwen2-VL-7B-Instruct's shape (its ViT: 32 blocks of 1280, 2x2 merger; M-RoPE 16/24/24;
  Qwen2-7B); 448x448 images are 32x32 patches, 256 tokens;
- llava-1.5-7b: CLIP ViT-L/14 at 336 px (576 image tokens), Llama-2-7B;
- tiny, tiny-onevision, tiny-qwen2-vl: CPU dry runs.

    python scripts/gpu_vision.py --out /tmp/gpu_vision            # on the GPU (scripts/gpu_vision.sh)
    python scripts/gpu_vision.py --shape tiny --device cpu --requests 8 --concurrency 4 --batch-sizes 1 2
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ONEVISION_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SHAPES = {
    "qwen2-vl-7b": dict(
        kind="qwen2_vl",
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        image_size=448),
    "llava-onevision-7b": dict(
        kind="onevision",
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=384, patch_size=14),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0),
        image_size=384),
    "llava-1.5-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5), image_size=336),
    "tiny-qwen2-vl": dict(
        kind="qwen2_vl",
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_size=448),
    "tiny-onevision": dict(
        kind="onevision",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=384,
                    patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096), image_size=384),
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                    patch_size=7, projection_dim=32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048), image_size=28),
}


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_checkpoint(shape: str, tokenizer_path: str, folder: str) -> None:
    import transformers as tf

    spec = SHAPES[shape]
    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    os.makedirs(folder, exist_ok=True)
    if spec.get("kind") == "qwen2_vl":
        special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tokenizer.add_special_tokens({"additional_special_tokens": special})
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
        config = tf.Qwen2VLConfig(text_config=dict(vocab_size=len(tokenizer), **spec["text"],
                                                   bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id),
                                  vision_config=spec["vision"], image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
        config.architectures = ["Qwen2VLForConditionalGeneration"]
        config.save_pretrained(folder)
        tf.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "processor_config.json"), "w") as f:
            json.dump({"processor_class": "Qwen2VLProcessor"}, f)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(QWEN_TEMPLATE)
        return
    if spec.get("kind") == "onevision":
        text = tf.Qwen2Config(vocab_size=len(tokenizer), **spec["text"], bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
        config = tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**spec["vision"]), text_config=text,
                                         image_token_index=image_token, vision_feature_layer=-1,
                                         vision_feature_select_strategy="full",
                                         image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9")
        config.architectures = ["LlavaOnevisionForConditionalGeneration"]
        config.save_pretrained(folder)
        tf.LlavaOnevisionImageProcessor(size={"height": 384, "width": 384},
                                        image_grid_pinpoints=ONEVISION_PINPOINTS).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "processor_config.json"), "w") as f:
            json.dump({"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 729,
                       "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}, f)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)
        return
    text = tf.LlamaConfig(vocab_size=len(tokenizer), **spec["text"], bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**spec["vision"]), text_config=text,
                            image_token_index=image_token, vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    size = spec["image_size"]
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=spec["vision"]["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)


def random_png(seed: int, size: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def prefill_table(folder: str, device: str, batch_sizes: list[int], text_tokens: int) -> list[str]:
    """Image prefill through the ModelRunner: B requests of one image (fresh pixels each) and `text_tokens` text
    tokens in one step; the vision tower's share timed separately."""
    import torch

    from runtime.messages import ArenaTensor, BatchPlan, ImageItem, NewRow, SamplingParams
    from runtime.multimodal.inputs import split_per_image
    from runtime.multimodal.processor import load_processor
    from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
    from shm import Arena, run_prefix, sweep

    processor = load_processor(folder)
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, load_format="dummy", device=device,
                                           max_running_requests=max(batch_sizes), disable_cuda_graph=True,
                                           max_total_tokens=max(batch_sizes) * 2048))
    prefix = f"{run_prefix()}vis{uuid.uuid4().hex[:6]}_"
    arena = Arena.create(prefix + "images", 1 << 30)
    image_token = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "describe " * text_tokens}]}], add_generation_prompt=True,
        tokenize=False)
    size = SHAPES_BY_FOLDER[folder]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    rows = ["| batch | image tokens/req | prefill tokens | vision ms | step ms | prefill tok/s | images/s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    batch_id = 0
    for batch in batch_sizes:
        for trial in range(3):  # the first is a warm-up
            from PIL import Image

            images = [Image.open(io.BytesIO(random_png(1000 * trial + i, size))) for i in range(batch)]
            requests = [processor(text=[text], images=[image], return_tensors="np", add_special_tokens=False)
                        for image in images]
            per_image = [split_per_image(inputs, 1)[0] for inputs in requests]
            plan = BatchPlan(batch_id=batch_id, rows=[], prefix_lens=[], extend_lens=[], input_ids=[], out_slots=[],
                             sample=[], future_slots=[])
            batch_id += 1
            next_slot = 1
            for i in range(batch):
                ids = [int(t) for t in requests[i]["input_ids"][0]]
                start = ids.index(image_token)
                length = ids.count(image_token)
                ids[start:start + length] = [(1 << 30) + i] * length
                tensors = {name: ArenaTensor(arena.name, arena.put(array.tobytes()), list(array.shape),
                                             str(array.dtype)) for name, array in per_image[i].items()}
                item = ImageItem(offset=start, length=length, tensors=tensors)
                plan.new_rows.append(NewRow(row=i, prefix_slots=[], sampling=SamplingParams(temperature=0.0),
                                            images=[item]))
                plan.rows.append(i)
                plan.prefix_lens.append(0)
                plan.extend_lens.append(len(ids))
                plan.input_ids.extend(ids)
                plan.out_slots.extend(range(next_slot, next_slot + len(ids)))
                next_slot += len(ids)
                plan.sample.append(True)
                plan.future_slots.append(i)
            on_device = [{name: torch.from_numpy(array).to(runner.device) for name, array in tensors.items()}
                         for tensors in per_image]
            sync()
            start_time = time.perf_counter()
            with torch.inference_mode():
                runner.model.encode_images(on_device)
            sync()
            vision_ms = (time.perf_counter() - start_time) * 1e3
            start_time = time.perf_counter()
            runner.step(plan)
            sync()
            step_ms = (time.perf_counter() - start_time) * 1e3
            plan_free = BatchPlan(batch_id=batch_id, rows=[], prefix_lens=[], extend_lens=[], input_ids=[],
                                  out_slots=[], sample=[], future_slots=[], freed_rows=list(range(batch)))
            batch_id += 1
            runner.step(plan_free)
            arena.release(max((t.block for t in item.tensors.values()), key=lambda b: b.end))
        tokens = len(plan.input_ids)
        rows.append(f"| {batch} | {length} | {tokens} | {vision_ms:.1f} | {step_ms:.1f} | "
                    f"{tokens / step_ms * 1e3:,.0f} | {batch / step_ms * 1e3:,.1f} |")
    runner.image_encoder.close()
    arena.close()
    sweep(prefix)
    return rows


def serving_table(folder: str, device: str, requests: int, concurrency: list[int], output_len: int,
                  log_dir: str) -> list[str]:
    """A server (dummy weights) answering chat requests with one distinct image each (a data URL of a random PNG)
    and a short question; non-streamed, greedy, ignore_eos. Each concurrency first runs an unmeasured wave of as many
    requests, on other images."""
    port = 30000 + os.getpid() % 2000
    log_path = os.path.join(log_dir, "server.log")
    log = open(log_path, "w")
    flags = ["--model-path", folder, "--load-format", "dummy", "--port", str(port), "--device", device,
             "--image-arena-mb", "2048"]
    server = subprocess.Popen([sys.executable, "-m", "runtime", *flags], stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO)
    rows = ["| concurrency | requests | req/s | output tok/s | mean latency s | p99 latency s | prompt tokens/req |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    try:
        deadline = time.monotonic() + 300
        while "Ready: serving" not in open(log_path).read():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + open(log_path).read()[-3000:])
            time.sleep(0.5)
        size = SHAPES_BY_FOLDER[folder]
        # every request of every wave its own image: a repeated image would be a radix-cache hit for its prefix
        waves = 2 * len(concurrency)
        urls = ["data:image/png;base64," + base64.b64encode(random_png(i, size)).decode()
                for i in range(waves * requests)]

        def one(i: int) -> tuple[float, dict]:
            body = {"model": "llava", "temperature": 0, "max_tokens": output_len, "ignore_eos": True,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}},
                                                              {"type": "text", "text": "What is in this image?"}]}]}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.load(response)
            return time.perf_counter() - start, answer["usage"]

        for wave, level in enumerate(concurrency):
            with concurrent.futures.ThreadPoolExecutor(level) as pool:  # unmeasured: Triton compiles at new shapes
                list(pool.map(one, range(2 * wave * requests, (2 * wave + 1) * requests)))
                start = time.perf_counter()
                results = list(pool.map(one, range((2 * wave + 1) * requests, (2 * wave + 2) * requests)))
            wall = time.perf_counter() - start
            latencies = sorted(r[0] for r in results)
            output = sum(r[1]["completion_tokens"] for r in results)
            prompt = sum(r[1]["prompt_tokens"] for r in results) / len(results)
            rows.append(f"| {level} | {requests} | {requests / wall:.2f} | {output / wall:,.0f} | "
                        f"{sum(latencies) / len(latencies):.2f} | {latencies[int(0.99 * (len(latencies) - 1))]:.2f} | "
                        f"{prompt:.0f} |")
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return rows


SHAPES_BY_FOLDER: dict[str, int] = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llava-onevision-7b", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", default=None, help="a Llama tokenizer folder (default: .models/llama-3-8b-dummy "
                                                          "or /work/shared/models/llama-3-8b-dummy)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default="/tmp/gpu_vision")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tokenizer = args.tokenizer or next(p for p in (os.path.join(REPO, ".models/llama-3-8b-dummy"),
                                                   "/work/shared/models/llama-3-8b-dummy") if os.path.isdir(p))
    folder = os.path.join(args.out, f"checkpoint-{args.shape}")
    build_checkpoint(args.shape, tokenizer, folder)
    SHAPES_BY_FOLDER[folder] = SHAPES[args.shape]["image_size"]
    prefill = [f"### Image prefill ({args.shape}, dummy weights, {args.device})", "",
               *prefill_table(folder, args.device, args.batch_sizes, args.text_tokens), ""]
    print("\n".join(prefill), flush=True)  # kept if the serving part fails
    serving = [f"### Serving one image per request ({args.shape}, {args.output_len} output tokens)", "",
               *serving_table(folder, args.device, args.requests, args.concurrency, args.output_len, args.out)]
    print("\n".join(serving))
    with open(os.path.join(args.out, "gpu_vision.md"), "w") as f:
        f.write("\n".join(prefill + serving) + "\n")


if __name__ == "__main__":
    main()

"""Write deterministic GPU telemetry CSVs: the sample in this folder, and large files for benchmarks.

python data/generate.py                                 # rewrites data/gpu_metrics.csv
python data/generate.py --rows 5000000 --out big.csv    # gpu_metrics shape, any size
python data/generate.py --dcgm --rows 100000 --out d.csv  # DCGM-exporter shape (12 columns, quoted labels)
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GPUS_PER_HOST = 8
HOSTS = ["dgx-a100-01", "dgx-a100-02", "dgx-h100-01", "dgx-h100-02"]
DCGM_METRICS = ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK"]


def gpu_rows(n: int, rng: random.Random):
    yield ["gpu_id", "utilization", "temperature", "memory_used", "hostname", "active"]
    load = {}
    for i in range(n):
        host = HOSTS[(i // GPUS_PER_HOST) % len(HOSTS)]
        gpu = i % GPUS_PER_HOST
        level = load.get((host, gpu), rng.uniform(0, 100))
        level = min(100.0, max(0.0, level + rng.gauss(0, 8)))
        load[(host, gpu)] = level
        active = level > 5
        utilization = round(level, 1) if active else 0
        temperature = int(35 + level * 0.45 + rng.randint(0, 4))
        memory = int(1024 + level * 790) if active else 0
        yield [gpu, utilization, temperature, memory, host, "true" if active else "false"]


def dcgm_rows(n: int, rng: random.Random):
    yield ["timestamp", "metric_name", "gpu_id", "device", "uuid", "modelName", "Hostname", "container", "pod", "namespace", "value", "labels_raw"]
    for i in range(n):
        host = HOSTS[(i // (GPUS_PER_HOST * len(DCGM_METRICS))) % len(HOSTS)]
        metric = DCGM_METRICS[(i // GPUS_PER_HOST) % len(DCGM_METRICS)]
        gpu = i % GPUS_PER_HOST
        uuid = f"GPU-{rng.getrandbits(32):08x}-{gpu:04x}-{i % 9973:04x}"
        value = {"DCGM_FI_DEV_POWER_USAGE": f"{rng.uniform(60, 700):.3f}"}.get(metric, str(rng.choice([0, 0, 1, rng.randint(0, 100)])))
        labels = f'DCGM_FI_DRIVER_VERSION="535.129.03",Hostname="{host}",UUID="{uuid}",__name__="{metric}",device="nvidia{gpu}",gpu="{gpu}",modelName="NVIDIA H100 80GB HBM3"'
        seconds = i // (GPUS_PER_HOST * len(DCGM_METRICS) * len(HOSTS))
        yield [
            f"2025-07-18T20:{42 + seconds // 60 % 18:02d}:{seconds % 60:02d}Z",
            metric,
            gpu,
            f"nvidia{gpu}",
            uuid,
            "NVIDIA H100 80GB HBM3",
            host,
            "",
            "",
            "",
            value,
            labels,
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--out", default=os.path.join(HERE, "gpu_metrics.csv"))
    parser.add_argument("--dcgm", action="store_true", help="DCGM exporter shape instead of gpu_metrics")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = dcgm_rows(args.rows, rng) if args.dcgm else gpu_rows(args.rows, rng)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL if args.dcgm else csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerows(rows)
    print(f"wrote {args.rows} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

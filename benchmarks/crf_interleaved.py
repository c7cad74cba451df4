"""fastseg.dense_crf against pydensecrf2 at 500x375, 21 labels, densecrf's default kernels,
interleaved call by call in one process (one call of each per round, the order alternating from
round to round), so that both see the same load on a shared machine. The inputs are those of
test_bench_dense_crf.py (same recipe and seed). Prints medians, minima, the speed-up (ratio of the
medians, and the range of the per-round ratios) and the parity of the two results (argmax
agreement, mean |dQ|).

    python benchmarks/crf_interleaved.py --threads 1 --iterations 5 10 --rounds 7
"""
import argparse
import statistics
import time

import numpy as np
import torch

import fastseg


def inputs(H=375, W=500, L=21):
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, L, max(H // 16, 2), max(W // 16, 2), generator=g) * 3
    logits = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    unary = (-torch.log_softmax(logits, 1)).contiguous()
    blocks = torch.randint(0, 256, (1, 3, max(H // 24, 2), max(W // 24, 2)), generator=g).float()
    image = torch.nn.functional.interpolate(blocks, size=(H, W), mode="nearest")
    image = (image + 10 * torch.randn(image.shape, generator=g)).clamp(0, 255).to(torch.uint8).contiguous()
    return unary, image


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iterations", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from pydensecrf import densecrf as dcrf

    torch.set_num_threads(args.threads)
    unary, image = inputs()
    _, L, H, W = unary.shape
    U = np.ascontiguousarray(unary[0].reshape(L, -1).numpy())
    rgb = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy())

    def ours(iterations):
        return fastseg.dense_crf(unary, image, iterations=iterations, unary="energy")

    def theirs(iterations):
        d = dcrf.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
        return np.array(d.inference(iterations))

    for iterations in args.iterations:
        q = ours(iterations)  # also the warm-up of both
        ref = torch.from_numpy(theirs(iterations)).reshape(q.shape).float()
        agree = (q.argmax(1) == ref.argmax(1)).double().mean().item()
        times = {"fastseg": [], "pydensecrf2": []}
        for r in range(args.rounds):
            # The order alternates from round to round, so that neither always runs first.
            pair = [("fastseg", ours), ("pydensecrf2", theirs)]
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                t = time.perf_counter()
                fn(iterations)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratios = [p / f for f, p in zip(times["fastseg"], times["pydensecrf2"])]
        print(f"threads={args.threads} iterations={iterations}: fastseg {med['fastseg']:.1f} ms "
              f"(min {min(times['fastseg']) * 1e3:.1f}), pydensecrf2 {med['pydensecrf2']:.1f} ms "
              f"(min {min(times['pydensecrf2']) * 1e3:.1f}), {med['pydensecrf2'] / med['fastseg']:.2f}x "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); "
              f"argmax agreement {agree:.4%}, mean |dQ| {(q - ref).abs().mean().item():.1e}", flush=True)


if __name__ == "__main__":
    main()

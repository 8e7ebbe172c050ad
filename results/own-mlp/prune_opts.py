import torch, numpy as np
from swsformat.retrain import data
from swsformat.quantize import kmeans_1d, snap, keep_mask
from mlp import Net
_, test = data.load("mnist", normalization="unit")
sd = torch.load("mlp.pt")
names = [n for n in sd if n.endswith("weight")]
def run(masks, k=16):
    kept = np.concatenate([sd[n].double().numpy().ravel()[masks[n]] for n in names])
    c = kmeans_1d(kept, k)
    out = dict(sd)
    for n in names:
        w = sd[n].double().numpy().ravel()
        out[n] = torch.from_numpy(np.where(masks[n], snap(w, c), 0.0).reshape(sd[n].shape)).float()
    m = Net(); m.load_state_dict(out); m.eval()
    with torch.no_grad(): return 100*(m(test.x).argmax(1) != test.y).float().mean().item(), {n: round(masks[n].mean(),3) for n in names}
P = 0.9
vals = {n: sd[n].double().numpy().ravel() for n in names}
flat = np.concatenate([np.abs(v) for v in vals.values()])
splits = np.cumsum([v.size for v in vals.values()])[:-1]
g = dict(zip(names, np.split(keep_mask(flat, P), splits)))
print("global", run(g))
print("per-layer", run({n: keep_mask(np.abs(v), P) for n, v in vals.items()}))
fan = {n: sd[n].shape[1] for n in names}
sc = np.concatenate([np.abs(v) * np.sqrt(fan[n]) for n, v in vals.items()])
print("global*sqrt(fanin)", run(dict(zip(names, np.split(keep_mask(sc, P), splits)))))
for floor in (0.25, 0.5):
    masks = {}
    for n in names:
        m = g[n].copy(); need = int(np.ceil(floor * (1-P) * m.size))
        if m.sum() < need: m = keep_mask(np.abs(vals[n]), 1 - need / m.size)
        masks[n] = m
    print("global+floor", floor, run(masks))

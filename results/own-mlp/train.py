import torch
from torch.nn import functional as F
from swsformat.retrain import data
from mlp import Net
torch.manual_seed(0)
train, test = data.load("mnist", normalization="unit")
m = Net(); opt = torch.optim.Adam(m.parameters(), 1e-3)
for epoch in range(4):
    perm = torch.randperm(len(train))
    for idx in perm.split(128):
        loss = F.cross_entropy(m(train.x[idx]), train.y[idx]); opt.zero_grad(); loss.backward(); opt.step()
torch.save(m.state_dict(), "mlp.pt")
m.eval(); print("err", (m(test.x).argmax(1) != test.y).float().mean().item()*100)

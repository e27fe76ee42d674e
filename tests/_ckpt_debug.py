import os, torch
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
import _pipeline_targets as T
from lightning_scale.strategies import PipelineStrategy

def run(ckpt_dir, resume, steps, strategy=None):
    snap = {}
    class Snap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= 8:
                snap.setdefault("xs", []).append(batch[0][:, 0].tolist())
                snap.setdefault("ws", []).append({k: v.clone() for k, v in pl_module.state_dict().items()})
            if trainer.global_step == 8 and "w" not in snap:
                opt = trainer.optimizers[0]
                snap["w"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
                names = {id(p): n for n, p in pl_module.named_parameters()}
                snap["o"] = {names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in opt.state.items()}
                snap["x"] = batch[0][:, 0].tolist()
    cbs = [Snap()]
    if ckpt_dir:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1))
    tr = L.Trainer(accelerator="cpu", devices=2, strategy=strategy or PipelineStrategy(stages=2, microbatches=4), max_steps=steps, logger=False,
                   enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=cbs)
    task = T._task()
    tr.fit(task, train_dataloaders=DataLoader(T.make_data(64), batch_size=8, drop_last=True), ckpt_path=resume)
    return snap

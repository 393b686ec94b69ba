"""Integrations with other libraries' trainers; each lives in its own module and is imported on use.

fastclip.integrations.open_clip        patch(): open_clip's loss classes replaced by fastclip's
fastclip.integrations.open_clip_train  python -m fastclip.integrations.open_clip_train <open_clip_train arguments>
fastclip.integrations.sentence_transformers  sentence-transformers' MNRL / GISTEmbed losses (and cached forms), fused
fastclip.integrations.transformers     patch(): transformers' CLIP/SigLIP/SigLIP2/AltCLIP/ChineseCLIP/VisionTextDualEncoder
                                       models compute their return_loss=True loss fused

Nothing is imported here: ``import fastclip`` never imports another library's trainer.
"""

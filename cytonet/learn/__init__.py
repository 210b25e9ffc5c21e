"""Training stages: SpatialNCE pretraining (``cytonet pretrain``) and area finetuning (``cytonet finetune``)."""

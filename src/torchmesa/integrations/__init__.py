"""Callbacks for the trainers people already use. Each imports its framework only when
asked for (``torchmesa.HFCallback``, ``torchmesa.LightningCallback``)."""

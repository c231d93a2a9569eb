"""The built-in PD-aware gateway (`slipstream router`): DLRouter's protocol, engines found through dlslime-ctrl."""

"""Drop-in integrations of fastrlhf into other trainers (README, "Use from TRL"); each module imports its
trainer library, which fastrlhf itself does not need."""

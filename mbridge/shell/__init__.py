"""The imperative shell: processes, devices, collectives and megatron.core live only here."""

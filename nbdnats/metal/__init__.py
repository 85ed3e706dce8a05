"""Bare metal: signed provisioning approvals (``approval``), TPM attestation (``attest``,
``tpm``), the RAM-booted installer, and host networking."""

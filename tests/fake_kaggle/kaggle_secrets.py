"""A stand-in for the kaggle_secrets module of Kaggle's notebook image (tests put this folder on sys.path): the secrets
named in FAKE_KAGGLE_SECRETS ("NAME=value,NAME=value") are the ones attached to the notebook."""
import os


class UserSecretsClient:
    def get_secret(self, label: str) -> str:
        attached = dict(kv.split("=", 1) for kv in os.environ.get("FAKE_KAGGLE_SECRETS", "").split(",") if kv)
        if label not in attached:  # what Kaggle's client raises for a secret that is not attached
            raise RuntimeError(f"Unexpected response from the service. Response: {{'errors': ['No user secrets "
                               f"exist for kernel id 1 and label {label}']}}.")
        return attached[label]

"""FHIR model layer: validation, outcomes, Patient compartment, search-parameter indexing."""

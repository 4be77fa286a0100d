"""Tiny chat records shared by the training and search tests."""

FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year."),
         ("What is city hall's phone number?", "Call (555) 201-4400.")]


def chat(question, answer):
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}

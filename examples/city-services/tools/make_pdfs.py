#!/usr/bin/env python3
"""Generate the PDF documents of the Maplewood city-services example dataset.

The text of every PDF lives in this script so the PDFs can be regenerated:

    python examples/city-services/tools/make_pdfs.py

Requires fpdf2 (``pip install fpdf2``). Only the core Helvetica font and plain
latin-1 text are used, so the output is a real text PDF that any extractor
(pypdf, pdfminer, ...) can read.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from fpdf import FPDF

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
FIXED_DATE = _dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=_dt.timezone.utc)

# Each document: (file name, title, subtitle, blocks).
# A block is ("h", text) for a heading, ("p", text) for a paragraph,
# ("li", text) for a bullet item, ("n", text) for a numbered step
# (the number is part of the text) and ("page", "") to force a new page.
DOCUMENTS = [
    (
        "property-tax-guide.pdf",
        "Property Tax Guide for Homeowners",
        "City of Maplewood - Assessor's Office and Treasury - 2024 Edition",
        [
            ("h", "About this guide"),
            ("p", "Property taxes pay for Maplewood's schools, police and fire protection, parks, libraries "
                  "and street maintenance. This guide explains how your property is assessed, when your tax "
                  "bill is due, which exemptions can lower your bill and how to appeal your assessment if you "
                  "believe it is wrong."),
            ("h", "How your tax is calculated"),
            ("p", "The Assessor's Office estimates the market value of every property in Maplewood as of "
                  "January 1 of each year. Your assessed value is 100 percent of that estimated market value. "
                  "Your tax is the assessed value, minus any exemptions, multiplied by the combined tax rate "
                  "of the city, the school district and the county. For 2024 the combined rate is $21.40 per "
                  "$1,000 of taxable value."),
            ("p", "Example: a home assessed at $300,000 with the homestead exemption has a taxable value of "
                  "$275,000. The yearly tax is 275 x $21.40 = $5,885."),
            ("h", "When bills are mailed and due"),
            ("p", "Property tax bills are mailed in July each year. Property tax is paid in two installments, "
                  "due September 30 and March 31. You may pay the full year with the first installment. If a "
                  "due date falls on a weekend or holiday, payment is accepted on the next business day."),
            ("h", "Late payments"),
            ("p", "Late property tax payments are charged a penalty of 1.5 percent per month. The penalty is "
                  "added on the first day of each month after the due date until the installment is paid. "
                  "Property with taxes unpaid for more than two years may be included in the county tax "
                  "lien sale."),
            ("page", ""),
            ("h", "Homestead exemption"),
            ("p", "The homestead exemption reduces your assessed value by $25,000 if you apply by April 1. "
                  "You qualify if you own the home and live in it as your main residence on January 1. You "
                  "only need to apply once; the exemption continues until you sell the home or move."),
            ("p", "To apply, send the homestead application form with a copy of your driver's license showing "
                  "the property address. Forms are available at the Assessor's Office and online at "
                  "maplewood.gov/assessor."),
            ("h", "Other exemptions and relief programs"),
            ("li", "Senior exemption: homeowners aged 65 and older with household income under $45,000 receive "
                   "an additional $15,000 exemption."),
            ("li", "Veterans with a service-connected disability rating of 50 percent or more may receive a "
                   "full or partial exemption."),
            ("h", "Appealing your assessment"),
            ("p", "Assessment notices are mailed in February. If you believe your assessed value is too high, "
                  "first call the Assessor's Office for an informal review. You can appeal your property "
                  "assessment within 45 days of the assessment notice date. Appeals are heard by the "
                  "Maplewood Board of Review, usually in April and May."),
            ("n", "1. Fill out the appeal form, available online or at the Assessor's Office."),
            ("n", "2. Attach evidence, such as recent sales of similar homes, a recent appraisal or photos of "
                  "damage."),
            ("n", "3. Submit the form in person, by mail or by email to assessor@maplewood.gov."),
            ("n", "4. Attend your hearing or ask for a decision based on the written evidence."),
            ("p", "Filing an appeal does not delay your tax due dates. If your assessment is lowered, you "
                  "will receive a refund or credit."),
            ("h", "Ways to pay"),
            ("p", "Pay online at maplewood.gov/tax by bank transfer (free) or card (2.5 percent fee), by mail "
                  "to Maplewood Treasury, PO Box 2240, or in person at the Treasury counter, City Hall Room "
                  "112, Monday to Friday from 8 am to 5 pm."),
            ("h", "Contact"),
            ("p", "Assessor's Office, City Hall Room 115: (555) 201-4415, assessor@maplewood.gov. "
                  "Treasury (payments): (555) 201-4416, treasury@maplewood.gov."),
        ],
    ),
    (
        "business-license-handbook.pdf",
        "Business License Handbook",
        "City of Maplewood - Office of the City Clerk",
        [
            ("h", "Who needs a business license"),
            ("p", "Every person or company doing business inside Maplewood city limits needs a city business "
                  "license. This includes stores, restaurants, offices, contractors, online sellers who work "
                  "from a Maplewood address, and home-based businesses. Nonprofit organizations and people "
                  "selling at a city-sponsored farmers market are exempt."),
            ("h", "License fees"),
            ("p", "A general business license costs $120 per year; a home-based business license costs $60. "
                  "Contractors from outside Maplewood who work on a project inside the city pay $120 per year "
                  "or $40 for a single project. Street vendors and food trucks need a separate vendor permit, "
                  "which costs $150 per year."),
            ("h", "How to apply for a new license"),
            ("n", "1. Register your business name with the state and get a state tax ID number."),
            ("n", "2. Check zoning. Call the Planning Division at (555) 201-4452 to confirm that your "
                  "business is allowed at your location."),
            ("n", "3. Complete the business license application at maplewood.gov/business or at the City "
                  "Clerk's Office, City Hall Room 110."),
            ("n", "4. Pay the license fee by card, check or cash."),
            ("n", "5. Schedule any required inspections (see page 2)."),
            ("p", "New business license applications are processed within 5 business days. Your license "
                  "certificate is emailed to you and must be displayed where customers can see it."),
            ("page", ""),
            ("h", "Inspections"),
            ("p", "Businesses open to the public must pass a fire inspection before the license is issued. "
                  "Food businesses, including restaurants, cafes, caterers and food trucks, need a health "
                  "inspection from the County Health Department before opening. Child care centers and "
                  "businesses selling alcohol need additional state licenses."),
            ("h", "Renewing your license"),
            ("p", "Business licenses must be renewed by January 31 each year. Renewal notices are emailed in "
                  "December. Late business license renewals pay a 25 percent penalty. A business that operates "
                  "without a license for more than 60 days may be fined $250 and ordered to close until it is "
                  "licensed."),
            ("h", "Changes to your business"),
            ("p", "Tell the City Clerk's Office within 30 days if you change your business name, address or "
                  "owner. A change of address within Maplewood costs $15 and may require a new fire "
                  "inspection. A license cannot be transferred to a new owner; the new owner must apply for "
                  "a new license."),
            ("h", "Closing your business"),
            ("p", "If you close your business, notify the City Clerk's Office in writing so that you are not "
                  "billed for renewal. Fees are not refunded for partial years."),
            ("h", "Help for small businesses"),
            ("p", "The Maplewood Small Business Center, located at the Central Library, offers free one-on-one "
                  "advice on business plans, financing and marketing. Appointments are available on Tuesdays "
                  "and Thursdays. The city also offers storefront improvement grants of up to $5,000 for "
                  "businesses in the downtown district."),
            ("h", "Contact"),
            ("p", "City Clerk's Office - Business Licenses, City Hall Room 110, Monday to Friday 8 am to 5 pm. "
                  "Phone (555) 201-4425. Email licenses@maplewood.gov."),
        ],
    ),
    (
        "snow-removal-plan.pdf",
        "Winter Snow and Ice Plan",
        "City of Maplewood - Department of Public Works",
        [
            ("h", "How the city clears snow"),
            ("p", "Maplewood Public Works uses 24 plows and 6 salt trucks to clear 210 miles of city streets. "
                  "Crews work in 12-hour shifts around the clock during a storm. Streets are plowed in order "
                  "of priority: first the snow routes and main roads, then bus routes and streets near schools "
                  "and the hospital, and finally residential side streets. Side streets are usually plowed "
                  "within 24 hours after the snow stops."),
            ("h", "Snow emergencies"),
            ("p", "A snow emergency is declared when 4 inches or more of snow is expected. Snow emergencies "
                  "are announced on MaplewoodAlert, the city website and local radio. During a snow emergency, "
                  "parking on snow routes is banned and violators are fined $50 and towed. Snow routes are "
                  "marked with red and white 'Snow Emergency Route' signs. Towed vehicles can be picked up at "
                  "the city impound lot, 1200 Industrial Way, for a $125 towing fee."),
            ("p", "Residents without off-street parking may park free in the Central Library garage and the "
                  "Depot Street garage during a declared snow emergency."),
            ("h", "Sidewalks"),
            ("p", "Property owners must clear sidewalks within 24 hours after snowfall ends. Clear a path at "
                  "least 36 inches wide, including curb ramps at corners. Do not shovel or blow snow into the "
                  "street. Owners who do not clear their sidewalk may receive a warning and then a $50 fine. "
                  "Seniors and residents with disabilities can sign up for the volunteer Snow Buddies program, "
                  "which matches them with neighbors who shovel for free."),
            ("h", "Mailboxes and trash"),
            ("p", "Mailboxes damaged by a plow are repaired or replaced by the city if the plow touched the "
                  "mailbox. Trash collection may be delayed during a snow emergency; place carts in your "
                  "driveway, not in the street."),
            ("h", "Contact"),
            ("p", "Call the snow hotline at (555) 201-4470. The hotline is staffed 24 hours a day during snow "
                  "emergencies. Report unplowed streets through the MapleFix app."),
        ],
    ),
    (
        "housing-assistance.pdf",
        "Housing Assistance Programs",
        "Maplewood Housing Authority",
        [
            ("h", "About the Housing Authority"),
            ("p", "The Maplewood Housing Authority helps low- and moderate-income residents find and keep safe, "
                  "affordable housing. The Maplewood Housing Authority is at 510 Spruce Street, phone "
                  "(555) 201-4700. Walk-in hours are Monday to Thursday from 9 am to 4 pm. Email "
                  "housing@maplewood.gov."),
            ("h", "Emergency rental assistance"),
            ("p", "Eligible households can receive one-time rental assistance of up to $1,500. The money is "
                  "paid directly to the landlord and can be used for back rent or a security deposit. "
                  "Households earning at or below 60 percent of area median income qualify for rental "
                  "assistance. For a family of four, that is about $62,000 per year. At least one adult in "
                  "the household must have lived in Maplewood for six months."),
            ("p", "To apply, bring a photo ID, your lease, proof of income for the last 30 days and any "
                  "eviction or late notice you have received. Applications are reviewed within 10 business "
                  "days; applications from households facing an eviction hearing are reviewed first."),
            ("h", "Housing Choice Vouchers"),
            ("p", "The Housing Choice Voucher program helps pay monthly rent in the private market. Families "
                  "pay about 30 percent of their income for rent and the voucher pays the rest. The waiting "
                  "list opens for two weeks each year in October; the current wait is about two years."),
            ("h", "Home repair grants"),
            ("p", "Senior homeowners can get home repair grants of up to $10,000. Grants pay for urgent "
                  "repairs such as roofs, furnaces, water heaters, ramps and grab bars. Homeowners must be 62 "
                  "or older, live in the home, and have household income at or below 80 percent of area "
                  "median income. Grants do not have to be repaid if the owner stays in the home for five "
                  "years."),
            ("h", "First-time homebuyers"),
            ("p", "First-time buyers can receive down payment help of up to $15,000 as a zero-interest loan "
                  "that is repaid when the home is sold. Buyers must complete an 8-hour homebuyer education "
                  "class, offered monthly at the Central Library."),
            ("h", "Fair housing"),
            ("p", "If you believe you were denied housing because of race, religion, disability, family "
                  "status or another protected reason, contact the Housing Authority's fair housing officer."),
        ],
    ),
    (
        "marriage-licenses.pdf",
        "Marriage Licenses",
        "City of Maplewood - Office of the City Clerk",
        [
            ("h", "Getting a marriage license"),
            ("p", "Couples who plan to marry in Maplewood can get a marriage license from the City Clerk's "
                  "Office, City Hall Room 110. Marriage license applications are taken Monday to Friday from "
                  "8:30 am to 4 pm. No appointment is needed, but allow about 30 minutes."),
            ("h", "Fee"),
            ("p", "A marriage license costs $50 at the City Clerk's Office. Payment can be made by cash, check "
                  "or card. Couples who complete an approved premarital education course of at least four "
                  "hours pay $25 instead."),
            ("h", "Requirements"),
            ("p", "Both partners must apply in person with a valid photo ID. Accepted IDs are a driver's "
                  "license, state ID card, passport or military ID. Both partners must be at least 18 years "
                  "old. If either partner was married before, bring the date the last marriage ended; a copy "
                  "of the divorce decree is only needed if the divorce was final within the last 30 days."),
            ("h", "Waiting period and expiration"),
            ("p", "There is a 3-day waiting period, and the license is valid for 60 days. For example, a "
                  "license issued on a Monday can be used starting Thursday. The waiting period can be waived "
                  "by a judge in special cases. If the license is not used within 60 days, you must apply and "
                  "pay again."),
            ("h", "The ceremony"),
            ("p", "The ceremony must take place in the state and be performed by an authorized officiant, "
                  "such as a judge, a member of the clergy or the Mayor. Two witnesses aged 18 or older must "
                  "sign the license. Civil ceremonies are held at City Hall on Fridays from 1 pm to 4 pm for a "
                  "$40 fee; book at least two weeks in advance."),
            ("h", "After the wedding"),
            ("p", "The officiant returns the signed license to the City Clerk within 10 days. A certified copy "
                  "of the marriage certificate costs $15 and is usually ready two weeks after the wedding. You "
                  "need a certified copy to change your name with Social Security and the motor vehicle "
                  "office."),
            ("h", "Contact"),
            ("p", "City Clerk's Office: (555) 201-4420, clerk@maplewood.gov."),
        ],
    ),
    (
        "youth-summer-jobs.pdf",
        "Youth Summer Jobs Program",
        "City of Maplewood - Youth and Workforce Services",
        [
            ("h", "Program overview"),
            ("p", "The Maplewood Youth Summer Jobs Program gives young people paid work experience with city "
                  "departments, nonprofit organizations and local businesses. This year the program has 320 "
                  "positions, including jobs as camp counselors, library aides, park maintenance workers, "
                  "office assistants and garden helpers."),
            ("h", "Who can apply"),
            ("p", "The youth summer jobs program is open to Maplewood residents aged 14 to 21. Applicants aged "
                  "14 and 15 need a work permit, which their school can issue. Priority is given to youth from "
                  "low-income households, youth in foster care and youth with disabilities."),
            ("h", "Pay and schedule"),
            ("p", "Youth summer jobs pay $15.50 per hour for up to 20 hours per week. The program lasts six "
                  "weeks, from July 1 to August 9. Participants are paid every two weeks by direct deposit or "
                  "pay card. Participants who complete all six weeks receive a $100 completion bonus."),
            ("h", "How to apply"),
            ("n", "1. Attend an information session (optional) at the Central Library on any Saturday in March "
                  "at 11 am."),
            ("n", "2. Complete the online application at maplewood.gov/youthjobs."),
            ("n", "3. Upload proof of age, proof of Maplewood residency and, if you are 14 or 15, your work "
                  "permit."),
            ("n", "4. Attend a short interview in May."),
            ("p", "The application deadline for youth summer jobs is April 15. Job offers are sent by email by "
                  "June 1. All participants must attend a paid one-day job readiness training in late June."),
            ("h", "Contact"),
            ("p", "Email youthjobs@maplewood.gov or call Youth and Workforce Services at (555) 201-4540."),
        ],
    ),
]


class CityPDF(FPDF):
    doc_title = ""

    def header(self):
        self.set_font("Helvetica", "B", 9)
        self.set_text_color(31, 78, 61)
        self.cell(0, 6, "CITY OF MAPLEWOOD", new_x="LMARGIN", new_y="NEXT")
        self.set_draw_color(31, 78, 61)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.ln(4)
        self.set_text_color(0, 0, 0)

    def footer(self):
        self.set_y(-15)
        self.set_font("Helvetica", "I", 8)
        self.set_text_color(90, 90, 90)
        self.cell(0, 8, f"{self.doc_title} - Page {self.page_no()} of {{nb}}", align="C")


def build(name: str, title: str, subtitle: str, blocks: list[tuple[str, str]]) -> Path:
    pdf = CityPDF(format="Letter")
    pdf.doc_title = title
    pdf.set_title(title)
    pdf.set_author("City of Maplewood")
    pdf.set_creator("tailor examples/city-services/tools/make_pdfs.py")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.set_margins(22, 18, 22)
    pdf.add_page()

    pdf.set_font("Helvetica", "B", 18)
    pdf.multi_cell(0, 9, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    pdf.set_text_color(80, 80, 80)
    pdf.multi_cell(0, 6, subtitle, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    pdf.ln(4)

    for kind, text in blocks:
        if kind == "page":
            pdf.add_page()
        elif kind == "h":
            pdf.ln(2)
            pdf.set_font("Helvetica", "B", 13)
            pdf.multi_cell(0, 7, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        elif kind == "p":
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind in ("li", "n"):
            pdf.set_font("Helvetica", "", 11)
            prefix = "- " if kind == "li" else ""
            pdf.set_x(pdf.l_margin + 5)
            pdf.multi_cell(0, 6, prefix + text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        else:
            raise ValueError(f"unknown block kind {kind!r}")

    out = DOCS_DIR / name
    pdf.output(str(out))
    return out


def main() -> None:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for name, title, subtitle, blocks in DOCUMENTS:
        for _kind, text in blocks:
            text.encode("latin-1")  # core fonts only support latin-1
        out = build(name, title, subtitle, blocks)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
